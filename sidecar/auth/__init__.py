"""Who is asking and what they may do: key format, credential extraction, verification, the key record, permissions."""
