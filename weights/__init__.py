"""See docs/design.md section 2 for what lives here."""
