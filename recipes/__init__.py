"""The training recipes, importable from the repository root (`from recipes.sft import main`)."""
