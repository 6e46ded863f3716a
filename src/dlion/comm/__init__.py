"""Messages, their encoded sizes, and collectives built from point-to-point messages."""
