"""hitl-service: hand a chatbot conversation to a human agent and back."""
