//! Page encryption and key management (being written).
