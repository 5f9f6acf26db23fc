"""The six pipeline steps' work, one module each, as blocking functions the hopeit events run in a thread."""
