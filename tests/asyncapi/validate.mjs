// Validates an AsyncAPI document (the file named by argv[2]) with the
// official parser; prints its diagnostics as JSON and exits 1 on an error.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(process.env.ASYNCAPI_MODULES + "/");
const { Parser, DiagnosticSeverity } = require("@asyncapi/parser");

const parser = new Parser();
const { document, diagnostics } = await parser.parse(readFileSync(process.argv[2], "utf8"));
const shown = diagnostics.map((d) => ({
  severity: d.severity,
  code: d.code,
  message: d.message,
  path: d.path.join("/"),
}));
console.log(JSON.stringify({ valid: document !== undefined, diagnostics: shown }));
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
process.exit(document === undefined || errors.length > 0 ? 1 : 0);
