"""Process-group creation for models placed on 3D meshes."""
