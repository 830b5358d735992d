"""PySide6 widgets and windows (the app issue fills this in)."""
