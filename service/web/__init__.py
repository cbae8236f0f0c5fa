"""The demo page at ``GET /``: upload an image, see the top-5 and where the model looked. Static files only,
served from the package (no external scripts, fonts or CDNs: it works offline, under a strict CSP)."""
