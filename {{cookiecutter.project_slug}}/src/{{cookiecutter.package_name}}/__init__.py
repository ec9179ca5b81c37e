"""{{ cookiecutter.project_name }}: a FastAPI service behind a layered, fail-closed security pipeline."""
