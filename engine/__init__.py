"""The ML: tokenizer, model, data, generation and the training stages. No Qt, no SQLite, no projects."""
