"""Pod namespaces (pinned with bind mounts) and pod networking through CNI."""
