//! TODO(helper): initrd
