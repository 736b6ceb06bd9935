"""The core: gates, the compression step, models, export and scoring; plain torch + transformers, no Ray."""
