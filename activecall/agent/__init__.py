"""The dialogue agent: what drives a call from a model's answers (the LLM client first)."""
