"""Online: one request -> frames -> MP4."""
