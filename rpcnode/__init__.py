"""The ikctl worker (an asyncio socket server owning one device); its protocol lands with issue 4."""
