"""The whole service with the LiveChat provider against the fake LiveChat."""
