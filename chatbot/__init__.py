"""CoRGI Chat: the Gradio web UI over corgi.pipeline.ChatSession (python -m chatbot)."""
