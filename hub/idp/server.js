// A local, standards-compliant OpenID Connect identity provider for tests and the demo.
//
// It plays a university IdP with eduPerson claims, built on `oidc-provider` (OpenID certified).
// Everything comes from the environment (never argv, so secrets stay out of `ps`):
//
//   IDP_PORT                 port to bind on 127.0.0.1 (required)
//   IDP_ISSUER               issuer URL (default http://127.0.0.1:$IDP_PORT)
//   IDP_CLIENT_ID            the hub's client id (default "sovereign-portal")
//   IDP_CLIENT_SECRET_FILE   file holding the hub's client secret (required)
//   IDP_REDIRECT_URIS        space-separated redirect URIs registered for the hub (required)
//   IDP_JWKS_FILE            JSON {"keys": [private JWK, ...]}; the first key signs (required)
//   IDP_USERS_FILE           sample users (default: users.json next to this file)
//   IDP_EXTENSION            optional path of an ES module, loaded before the server listens;
//                            its default export is called once with { provider, jwks, routes,
//                            readForm, load }: it may add koa middleware (provider.use) and
//                            routes (routes.set(pathname, async (req, res) => ...)); load(name)
//                            imports a package of this IdP. `sovereign-portal up` never sets it.
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import crypto from 'node:crypto';
import { fileURLToPath, pathToFileURL } from 'node:url';

import Provider from 'oidc-provider';

const here = path.dirname(fileURLToPath(import.meta.url));

function need(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`idp: environment variable ${name} is required`);
    process.exit(2);
  }
  return value;
}

const port = Number(need('IDP_PORT'));
const issuer = process.env.IDP_ISSUER || `http://127.0.0.1:${port}`;
const clientId = process.env.IDP_CLIENT_ID || 'sovereign-portal';
const clientSecret = fs.readFileSync(need('IDP_CLIENT_SECRET_FILE'), 'utf8').trim();
const redirectUris = need('IDP_REDIRECT_URIS').split(/\s+/).filter(Boolean);
const jwks = JSON.parse(fs.readFileSync(need('IDP_JWKS_FILE'), 'utf8'));
const users = JSON.parse(
  fs.readFileSync(process.env.IDP_USERS_FILE || path.join(here, 'users.json'), 'utf8'),
).users;
const redirectOrigins = [...new Set(redirectUris.map((u) => new URL(u).origin))].join(' ');

if (clientSecret.length < 16) {
  console.error('idp: the client secret must be at least 16 characters');
  process.exit(2);
}

const CLAIM_SCOPES = {
  openid: ['sub'],
  profile: ['name', 'given_name', 'family_name', 'preferred_username'],
  email: ['email', 'email_verified'],
  groups: ['groups'],
  eduperson_affiliation: ['eduPersonAffiliation'],
  eduperson_entitlement: ['eduPersonEntitlement'],
  schac_home_organization: ['schacHomeOrganization'],
};

function findUser(login) {
  return users.find((u) => u.username === login);
}

const configuration = {
  clients: [
    {
      client_id: clientId,
      client_secret: clientSecret,
      redirect_uris: redirectUris,
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_post',
      id_token_signed_response_alg: 'RS256',
    },
  ],
  jwks,
  claims: CLAIM_SCOPES,
  scopes: Object.keys(CLAIM_SCOPES),
  // Put the granted claims into the ID token too, so the hub can rely on signed claims.
  conformIdTokenClaims: false,
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  pkce: { required: () => true },
  features: { devInteractions: { enabled: false } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  ttl: { AccessToken: 600, AuthorizationCode: 60, IdToken: 300, Interaction: 600, Session: 3600, Grant: 3600 },
  async findAccount(ctx, sub) {
    const user = users.find((u) => u.sub === sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        return { sub, ...user.claims };
      },
    };
  },
  // Auto-consent for the one registered client: the hub is a first-party application.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope(ctx.oidc.params.scope || 'openid');
    await grant.save();
    return grant;
  },
  renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Sign-in error', `<p>${esc(out.error)}: ${esc(out.error_description || '')}</p>`);
  },
};

const provider = new Provider(issuer, configuration);

// --- an optional extension (IDP_EXTENSION): middleware and routes of its own --------------
const routes = new Map();
if (process.env.IDP_EXTENSION) {
  const extension = await import(pathToFileURL(path.resolve(process.env.IDP_EXTENSION)).href);
  await extension.default({ provider, jwks, routes, readForm, load: (name) => import(name) });
  console.log(`idp: extension ${process.env.IDP_EXTENSION} loaded`);
}

// --- login pages ----------------------------------------------------------------------------
function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function page(title, body) {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>${esc(title)}</title>
<style>body{font-family:sans-serif;max-width:28rem;margin:3rem auto}label,input,button{display:block;margin:.4rem 0}</style>
</head><body><h1>${esc(title)}</h1>${body}</body></html>`;
}

function loginForm(uid, error) {
  return page('University sign-in', `
${error ? `<p class="error" role="alert">${esc(error)}</p>` : ''}
<form method="post" action="/interaction/${esc(uid)}/login" autocomplete="off">
  <label for="username">Username</label><input id="username" name="username" autocomplete="username" required autofocus>
  <label for="password">Password</label><input id="password" name="password" type="password" autocomplete="current-password" required>
  <button type="submit" id="login">Sign in</button>
</form>`);
}

function readForm(req) {
  return new Promise((resolve, reject) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => {
      body += chunk;
      if (body.length > 8192) reject(new Error('form too large'));
    });
    req.on('end', () => resolve(new URLSearchParams(body)));
    req.on('error', reject);
  });
}

function send(res, status, html) {
  res.writeHead(status, {
    'content-type': 'text/html; charset=utf-8',
    'cache-control': 'no-store',
    // form-action also governs the redirects after the POST: allow the hub's callback origins.
    'content-security-policy': `default-src 'none'; style-src 'unsafe-inline'; form-action 'self' ${redirectOrigins}`,
  });
  res.end(html);
}

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return send(res, 400, page('Sign-in error', '<p>Interaction mismatch.</p>'));
  if (req.method === 'GET' && !action) {
    return send(res, 200, loginForm(uid));
  }
  if (req.method === 'POST' && action === 'login') {
    const form = await readForm(req);
    const user = findUser(form.get('username') || '');
    const given = Buffer.from(form.get('password') || '');
    const wanted = Buffer.from(user ? user.password : crypto.randomBytes(16).toString('hex'));
    const ok = user && given.length === wanted.length && crypto.timingSafeEqual(given, wanted);
    if (!ok) {
      console.log('idp: failed login');
      return send(res, 401, loginForm(uid, 'Invalid username or password.'));
    }
    console.log(`idp: login ${user.username}`);
    return provider.interactionFinished(req, res, { login: { accountId: user.sub } }, {
      mergeWithLastSubmission: false,
    });
  }
  return send(res, 405, page('Sign-in error', '<p>Method not allowed.</p>'));
}

const callback = provider.callback();

const server = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, issuer);
    const m = url.pathname.match(/^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login))?$/);
    if (m) return await interaction(req, res, m[1], m[2]);
    const route = routes.get(url.pathname);
    if (route) return await route(req, res);
    if (url.pathname === '/healthz') {
      res.writeHead(200, { 'content-type': 'text/plain' });
      return res.end('ok');
    }
    return callback(req, res);
  } catch (err) {
    console.error(`idp: ${err.name}: ${err.message}`);
    if (!res.headersSent) send(res, 400, page('Sign-in error', `<p>${esc(err.message)}</p>`));
    else res.end();
  }
});

server.listen(port, '127.0.0.1', () => {
  console.log(`idp: listening on ${issuer} (client ${clientId}, ${users.length} users)`);
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
