"""End-to-end tasks run by the binaries in train/ (they only parse flags)."""
