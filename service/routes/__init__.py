"""HTTP routes; each module has one `router`."""
