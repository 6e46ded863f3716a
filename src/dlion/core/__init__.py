"""What every part of dlion uses: config, registry, user code, errors, outputs."""
