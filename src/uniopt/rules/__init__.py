"""One file per family of algorithms; each rule is a record plus a recipe of parts."""
