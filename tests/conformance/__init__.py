"""One suite, every transport: the promises of ``surge.Transport``."""
