"""Jobs wired onto the engines: the application level, where an engine meets an algorithm
family that it must not import itself (the FL server and clients on the virtual runtime)."""
