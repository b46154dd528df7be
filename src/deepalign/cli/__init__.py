"""Command-line interface (no logic of its own: it parses, calls the library, prints)."""
