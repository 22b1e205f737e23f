"""nervedet: nerves, PNI and immune cells in H&E whole-slide images."""
