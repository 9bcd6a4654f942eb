"""The similarities' names, importable without torch (the CLI's and the server's option checks read them)."""

SIMILARITY_NAMES: tuple[str, ...] = ("token-overlap", "jury-embedding", "jury-judge")
# Chosen by measurement: results/certainty/kle.md (olmo-tap experiment certainty).
DEFAULT_SIMILARITY = "token-overlap"
