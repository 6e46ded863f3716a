"""`dlion probe`: measure step times and links, write a measured cluster."""
