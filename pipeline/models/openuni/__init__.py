"""OpenUni (wusize/OpenUni): frozen InternVL3 + meta queries + connector + SANA + DC-AE.
The registry reads :mod:`.spec`; :mod:`.model` holds the adapter."""
