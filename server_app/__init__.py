"""The FastAPI server that holds and trains the server segment of a split.

Example:
    >>> from server_app import create_app, ServerSettings
    >>> app = create_app(ServerSettings(split_dir="out"))     # doctest: +SKIP
"""

from server_app.main import create_app
from server_app.settings import ServerSettings

__all__ = ["create_app", "ServerSettings"]
