"""sovereign_portal.hub: identity, roles, policy, the catalog API and the hub entry points."""
