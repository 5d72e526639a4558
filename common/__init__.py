"""Code shared by the server and the sites: data, models, losses, metrics, configuration."""
