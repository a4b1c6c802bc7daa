"""OpenAI backend (``backend="openai"``): ``backend.py`` holds the SDK lifecycle, ``mapping.py`` the field and
status maps. Nothing heavy is imported here: the registry imports ``backend`` on first use, and the
``openai`` SDK is imported only when a client is made."""
