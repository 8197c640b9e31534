"""The Lua scripts of the Redis transport: each settles or moves entries
atomically, so a crash between two commands cannot lose or duplicate one.

Scheduled entries (a sorted set member) are ``attempt:first_time:token:payload``;
the payload is the encoded envelope, which may itself contain ``:``. The
token of an entry from partition ``p`` is ``p/<entry id>`` (``p/`` alone for
a keyed envelope published with a future ``not_before``): the mover puts it
back into that partition's stream.
"""

__all__ = (
    "ACK",
    "BALANCE",
    "DEAD",
    "DECLARE",
    "FORGET",
    "HANDBACK",
    "LAYOUT",
    "MOVE",
    "NACK",
    "OWN",
    "PUBLISH",
    "RAISE",
    "SCRIPTS",
    "SWEEP",
)

# KEYS: the registry version (on a cluster, in a partition's slot: its copy
# there); ARGV: the version routed on,
# the dedup window, max_len, then per envelope: kind ('s' stream, 'z'
# delayed), dedup key, not_before, partition ('n/'), n, n keys, payload.
PUBLISH = """
local v = redis.call('GET', KEYS[1]) or ''
if v ~= ARGV[1] then return -1 end
local window = ARGV[2]
local maxlen = ARGV[3]
local i = 4
local added = 0
local n_args = #ARGV
while i <= n_args do
  local kind = ARGV[i]
  local dkey = ARGV[i + 1]
  local part = ARGV[i + 3]
  local n = tonumber(ARGV[i + 4])
  local payload = ARGV[i + 5 + n]
  local fresh = true
  if dkey ~= '' then
    fresh = redis.call('SET', dkey, '1', 'NX', 'EX', window)
  end
  if fresh then
    for j = 1, n do
      local key = ARGV[i + 4 + j]
      if kind == 's' then
        if maxlen == '' then
          redis.call('XADD', key, '*', 'e', payload)
        else
          redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'e', payload)
        end
      else
        redis.call('ZADD', key, ARGV[i + 2], '1:0:' .. part .. ':' .. payload)
      end
    end
    added = added + 1
  end
  i = i + 6 + n
end
return added
"""

# KEYS: registry hash, its version, shared stream, partition counts hash,
# the group's liveness key; ARGV: group, partitions (0: none, an ephemeral
# group), partition stream key before and after the number ('' on a
# cluster: the partitions' streams are in other slots, created before),
# liveness TTL (ms, ephemeral groups), patterns...
DECLARE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local seen = {}
local list = {}
if cur then
  for p in string.gmatch(cur, '[^\\n]+') do
    if not seen[p] then seen[p] = true; table.insert(list, p) end
  end
end
local changed = not cur
for i = 6, #ARGV do
  if not seen[ARGV[i]] then
    seen[ARGV[i]] = true
    table.insert(list, ARGV[i])
    changed = true
  end
end
if redis.call('HGET', KEYS[4], ARGV[1]) ~= ARGV[2] then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
  changed = true
end
if changed then
  redis.call('HSET', KEYS[1], ARGV[1], table.concat(list, '\\n'))
  redis.call('INCR', KEYS[2])
end
if ARGV[2] == '0' then
  redis.call('SET', KEYS[5], '1', 'PX', ARGV[5])
end
redis.pcall('XGROUP', 'CREATE', KEYS[3], ARGV[1], '0', 'MKSTREAM')
if ARGV[3] ~= '' then
  for p = 0, tonumber(ARGV[2]) - 1 do
    redis.pcall('XGROUP', 'CREATE', ARGV[3] .. p .. ARGV[4], ARGV[1], '0', 'MKSTREAM')
  end
end
return redis.call('GET', KEYS[2])
"""

# KEYS: stream, zset; ARGV: group, entry id, delayed?, score, attempt,
# first_time, token (the entry id, with its partition)
NACK = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if #e == 0 then return 0 end
local f = e[1][2]
local payload
for k = 1, #f, 2 do if f[k] == 'e' then payload = f[k + 1] end end
if not payload then return 0 end
if ARGV[3] == '0' then
  redis.call('XADD', KEYS[1], '*', 'e', payload, 'a', ARGV[5], 'f', ARGV[6])
else
  local member = ARGV[5] .. ':' .. ARGV[6] .. ':' .. ARGV[7] .. ':' .. payload
  redis.call('ZADD', KEYS[2], ARGV[4], member)
end
return 1
"""

# Hand back entries pending to this consumer that no handler saw (released
# at a stop, read and never handed out), as the attempt they had: ARGV's,
# or when 0 (read by a read whose reply never came) the entry's 'a' field
# (1 without) plus its delivery count less that read. Mode 'p' (a
# partition): they stay pending where they are, for the partition's next
# owner to claim first, with the delivery count that makes the claim's
# attempt (the 'a' field plus the count) that one; setting the count rather
# than taking one off keeps a retried call harmless. Mode 's' (the shared
# stream): moved to its end as by NACK, the attempt in their 'a' field.
# KEYS: stream; ARGV: group, consumer, mode, then per entry its id and
# attempt. Returns how many were still this consumer's.
HANDBACK = """
local n = 0
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    local base, payload, first = 1, nil, nil
    local e = redis.call('XRANGE', KEYS[1], id, id)
    if #e == 1 then
      local f = e[1][2]
      for k = 1, #f, 2 do
        if f[k] == 'a' then base = tonumber(f[k + 1]) or 1
        elseif f[k] == 'e' then payload = f[k + 1]
        elseif f[k] == 'f' then first = f[k + 1] end
      end
    end
    local attempt = tonumber(ARGV[i + 1])
    if attempt == 0 then attempt = base + math.max(0, tonumber(p[1][4]) - 1) end
    if ARGV[3] == 'p' then
      local count = math.max(0, attempt - base)
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'RETRYCOUNT', count, 'JUSTID')
      n = n + 1
    elseif payload then
      redis.call('XACK', KEYS[1], ARGV[1], id)
      redis.call('XDEL', KEYS[1], id)
      if first then
        redis.call('XADD', KEYS[1], '*', 'e', payload, 'a', attempt, 'f', first)
      else
        redis.call('XADD', KEYS[1], '*', 'e', payload, 'a', attempt)
      end
      n = n + 1
    end
  end
end
return n
"""

# KEYS: stream, dead stream; ARGV: group, token, record, envelope id
DEAD = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'r', ARGV[3], 'i', ARGV[4])
return 1
"""

# KEYS: zset, stream; ARGV: now, limit, partition stream key before and
# after the number ('' when the group has no partitions)
MOVE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, m in ipairs(due) do
  local p1 = string.find(m, ':', 1, true)
  local p2 = string.find(m, ':', p1 + 1, true)
  local p3 = string.find(m, ':', p2 + 1, true)
  local target = KEYS[2]
  local slash = string.find(m, '/', p2 + 1, true)
  if ARGV[3] ~= '' and slash and slash < p3 then
    target = ARGV[3] .. string.sub(m, p2 + 1, slash - 1) .. ARGV[4]
  end
  redis.call('XADD', target, '*', 'e', string.sub(m, p3 + 1),
             'a', string.sub(m, 1, p1 - 1), 'f', string.sub(m, p1 + 1, p2 - 1))
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, nxt[2] or ''}
"""

# KEYS: stream; ARGV: group, consumer
FORGET = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p == 0 then redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return #p
"""

# KEYS: streams; ARGV: for each stream, its group then its ids joined by ','.
# One argument per group keeps the client from packing every id separately.
ACK = """
local n = 0
for k = 1, #KEYS do
  local ids = {}
  for id in string.gmatch(ARGV[2 * k], '[^,]+') do
    table.insert(ids, id)
    if #ids == 500 then
      n = n + redis.call('XACK', KEYS[k], ARGV[2 * k - 1], unpack(ids))
      redis.call('XDEL', KEYS[k], unpack(ids))
      ids = {}
    end
  end
  if #ids > 0 then
    n = n + redis.call('XACK', KEYS[k], ARGV[2 * k - 1], unpack(ids))
    redis.call('XDEL', KEYS[k], unpack(ids))
  end
end
return n
"""

# A consumer's membership of a group, on the server's clock.
# KEYS: members zset; ARGV: consumer, lease (ms), leaving ('1' or '0').
# Returns the live members.
BALANCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], 10 * tonumber(ARGV[2]))
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# Partition leases. KEYS: one lease key per ARGV pair; ARGV: consumer, lease
# (ms), then per key an op: 'a' acquire if free, 'r' renew if ours, 'd'
# release if ours. Returns 1 (done) or 0 (not ours / taken) per key.
OWN = """
local out = {}
for k = 1, #KEYS do
  local op = ARGV[k + 2]
  local ok = 0
  if op == 'a' then
    if redis.call('SET', KEYS[k], ARGV[1], 'NX', 'PX', ARGV[2]) then ok = 1
    elseif redis.call('GET', KEYS[k]) == ARGV[1] then
      redis.call('PEXPIRE', KEYS[k], ARGV[2]); ok = 1
    end
  elseif redis.call('GET', KEYS[k]) == ARGV[1] then
    if op == 'r' then redis.call('PEXPIRE', KEYS[k], ARGV[2]) else redis.call('DEL', KEYS[k]) end
    ok = 1
  end
  out[k] = ok
end
return out
"""

# Forget ephemeral groups (reply inboxes) whose process stopped renewing
# their liveness key: it was killed. KEYS: registry hash, its version,
# partition counts hash; ARGV: prefix. Returns how many were removed.
SWEEP = """
local flat = redis.call('HGETALL', KEYS[3])
local n = 0
for k = 1, #flat, 2 do
  local g = flat[k]
  if flat[k + 1] == '0' and redis.call('EXISTS', ARGV[1] .. ':a:' .. g) == 0 then
    redis.call('HDEL', KEYS[1], g)
    redis.call('HDEL', KEYS[3], g)
    redis.call('DEL', ARGV[1] .. ':s:' .. g, ARGV[1] .. ':z:' .. g, ARGV[1] .. ':d:' .. g)
    n = n + 1
  end
end
if n > 0 then redis.call('INCR', KEYS[2]) end
return n
"""

# A condition's state saved only while its source delivery is this
# consumer's (``FencedState``): the partition's lease still ours, and the
# entry still pending to us (the next owner acks it once handled).
# KEYS: the partition's lease (or the stream again, unkeyed), its stream, the
# state key; ARGV: consumer, group, entry id, value, '1' to check the lease,
# '1' to check the entry (on a cluster a partition's stream is in another
# slot than its lease and the state: the entry is checked just before, and
# KEYS[2] is the lease again).
SAVE_HELD = """
if ARGV[5] == '1' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[6] == '1' and
    #redis.call('XPENDING', KEYS[2], ARGV[2], ARGV[3], ARGV[3], 1, ARGV[1]) == 0 then
  return 0
end
redis.call('SET', KEYS[3], ARGV[4])
return 1
"""

# The key layout of a cluster's prefix (``_keys.LAYOUT``): recorded by the
# first process, refused when it differs, or when the prefix has keys of the
# layout before any was recorded. KEYS: layout key, partition count key;
# ARGV: our layout. Returns the prefix's ('' : the unrecorded first one).
LAYOUT = """
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
if redis.call('EXISTS', KEYS[2]) == 1 then return '' end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

# A partition slot's copy of the registry version raised to ARGV[1] (never
# lowered: declares may race), or with ARGV[2] '1' set to it (the prefix's
# version went back: its master lost its data). KEYS: the copy. Returns how
# far the copy is ahead (0: not).
RAISE = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local v = tonumber(ARGV[1])
if cur < v or (ARGV[2] == '1' and cur ~= v) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 0
end
return cur - v
"""

# name -> source, as the connection registers them (see ``Connection.run``)
SCRIPTS: dict[str, str] = {
    "publish": PUBLISH,
    "ack": ACK,
    "declare": DECLARE,
    "nack": NACK,
    "handback": HANDBACK,
    "dead": DEAD,
    "move": MOVE,
    "forget": FORGET,
    "balance": BALANCE,
    "own": OWN,
    "sweep": SWEEP,
    "save_held": SAVE_HELD,
    "layout": LAYOUT,
    "raise": RAISE,
}
