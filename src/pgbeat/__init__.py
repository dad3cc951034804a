"""pgbeat: a task scheduler whose every coordination rule lives in PostgreSQL."""

__version__ = "0.1.0"
