"""The hopeit plugin event that sets up the pooled Redis connections of the stream manager."""
