"""Stage 6, serving: the screening station, a web app and JSON API over a trained run."""
