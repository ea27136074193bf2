"""Files and what they hold: GGUF, APR and manifest readers/writers, the model-file view over them,
synthetic test files, the reference codecs of the quant types, and the teacher's tokenizer."""
