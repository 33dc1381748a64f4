"""Model families behind one interface, and the tokenizer helpers they share."""
