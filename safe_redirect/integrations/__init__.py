"""Drop-in replacements for the console capture of other libraries."""
