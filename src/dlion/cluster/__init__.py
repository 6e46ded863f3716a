"""The simulated micro-cloud: sites, links, traces, membership, vector costs."""
