"""``POST /v1/responses``: OpenAI's Responses API, stateless, over the chat service (same credits and limits),
with function tools as the chat service's tools."""
