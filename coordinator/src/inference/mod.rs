//! Inference across the cluster: which nodes serve which models ([`models`]), and chat answers
//! placed on a node serving the model that continue on another when it fails ([`chat`]).

pub mod chat;
pub mod models;

pub use chat::Chats;
