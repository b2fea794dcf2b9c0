"""Data pipeline for moshax: built-in text corpus, sentencepiece tokenizer, text sources and the
Grain loader that packs tokenized documents into fixed-length training rows."""
