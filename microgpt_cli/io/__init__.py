"""Files in and out: the checkpoint format, export and import of other formats, atomic writes."""
