"""fp8fx.passes: compile-time FX/Inductor passes (installed from the repository's passes/)."""
