"""Data: corpus readers (LibriSpeech layout, HF parquet), the synthetic corpus, features, the prepare
stage (Ray Data) and training / evaluation batches."""
