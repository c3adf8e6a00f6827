"""WSGI entry point: `.env` first (the real environment wins), then the app."""

from dotenv import load_dotenv

load_dotenv()

from llm_service import create_app  # noqa: E402

app = create_app()
