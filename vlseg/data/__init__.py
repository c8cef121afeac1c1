"""Data: demo generator, datalist format, converters for public layouts, transforms."""
