"""HiFi-TSE: BSRNN band split, USEF cross-attention and FiLM, TF-GridNet blocks with speaker
re-injection (doc/design.md, "Generator")."""
