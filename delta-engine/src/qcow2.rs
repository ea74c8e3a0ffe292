//! Reading the clusters a qcow2 layer allocated, and writing a qcow2 layer over a raw base.
