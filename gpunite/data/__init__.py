"""Data: readers for Pile/jsonl/txt corpora, the built-in offline corpus, tokenizers and content-addressed shards."""
